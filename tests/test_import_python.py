"""``ood-audit import python FILE.py:FACTORY``: any torch module with a log-density, wrapped
as the ``imported`` family. The change of variables of ``--input-range`` and the discrete
offset of ``--discrete`` are terms of their own, so log p(x) is the density of our
dequantized x; a module's own ``log_prob_terms`` become columns; weights are data; the
file is run again by ``score`` only when its sha256 is unchanged; a bad module is one line,
exit 2, nothing written."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import save_file

from ood_audit.analysis.tables import load_run_scores
from ood_audit.checkpoint import load_checkpoint
from ood_audit.models.imported import DISCRETE_TERM, INPUT_TERM, ImportedModel
from ood_audit.runs import RunDir

D = 64  # tiny_data: 8x8 gray

GAUSS = """
import math
import torch
from torch import nn


class Gauss(nn.Module):
    '''A diagonal Gaussian over images, in whatever range it is given.'''

    def __init__(self, mean=0.0):
        super().__init__()
        self.mean = nn.Parameter(torch.full((1, 8, 8), mean))
        self.log_std = nn.Parameter(torch.full((1, 8, 8), -0.5))

    def log_prob(self, y):
        assert y.dtype == torch.float32 and y.shape[1:] == (1, 8, 8), (y.dtype, y.shape)
        z = (y - self.mean) / self.log_std.exp()
        return (-0.5 * z ** 2 - self.log_std - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)


def make():
    return Gauss()
"""






def module_file(folder, body: str, name: str = "mod.py"):
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


def imported(run) -> ImportedModel:
    model, _ = load_checkpoint(run / "model.safetensors")
    assert isinstance(model, ImportedModel)
    return model


def gauss_log_prob(y, mean=0.0, log_std=-0.5):
    z = (y - mean) / math.exp(log_std)
    return (-0.5 * z ** 2 - log_std - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)


@pytest.mark.parametrize("input_range,a,b", [("0,1", 1.0, 0.0), ("-0.5,0.5", 1.0, -0.5),
                                             ("-1,1", 2.0, -1.0), ("0,255", 256.0, 0.0)])
def test_the_input_range_is_a_change_of_variables_with_its_own_term(in_tmp, tiny_data, capsys,
                                                                      input_range, a, b):
    src = module_file(in_tmp, GAUSS)
    code, out, err = run_cli(["import", "python", f"{src}:make", "--input-range", input_range,
                          "--data", tiny_data, "--out", "runs/g"], capsys)
    assert code == 0, err
    model = imported(in_tmp / "runs/g")
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        terms = model.log_prob_terms(x)
    torch.testing.assert_close(terms["log_prob"], gauss_log_prob(a * x + b))
    if a != 1:  # the change of variables, a term of its own; none when it is zero
        torch.testing.assert_close(terms[INPUT_TERM], torch.full((5,), D * math.log(a)))
    assert (INPUT_TERM in terms) == (a != 1)
    code, _, err = run_cli(["score", "runs/g", "--ood", "noise-uniform", "--limit", "32",
                        "--train-limit", "16"], capsys)
    assert code == 0, err
    df, meta = load_run_scores(RunDir(in_tmp / "runs/g"))
    assert meta.model == "imported" and meta.terms == ["log_prob"] + [INPUT_TERM] * (a != 1)
    input_term = df[INPUT_TERM] if a != 1 else 0.0
    torch.testing.assert_close(torch.tensor(df["log_px"].to_numpy()),
                               torch.tensor((df["log_prob"] + input_term).to_numpy()))


def test_a_plain_module_file_is_audited_end_to_end(in_tmp, tiny_data, tiny_ood, capsys):
    src = module_file(in_tmp, GAUSS)
    steps = [["import", "python", f"{src}:make", "--data", tiny_data, "--out", "runs/g"],
             ["score", "runs/g", "--ood", tiny_ood, "--ood", "noise-uniform", "--limit", "64",
              "--train-limit", "32"],
             ["decompose", "runs/g"],
             ["report", "runs/g", "--n-boot", "0", "--gate", "noise-uniform:auroc>=0"]]
    for argv in steps:
        code, out, err = run_cli(argv, capsys)
        assert code == 0, (argv, err)
    assert (in_tmp / "runs/g/report/summary.json").exists()
    assert (in_tmp / "runs/g/decomposition.parquet").exists()


def test_weights_are_read_as_data_and_a_changed_file_or_weights_file_is_refused(
        in_tmp, tiny_data, capsys):
    src = module_file(in_tmp, GAUSS)
    state = {"mean": torch.full((1, 8, 8), 0.25), "log_std": torch.full((1, 8, 8), -1.0)}
    save_file(state, str(in_tmp / "w.safetensors"))
    torch.save(state, in_tmp / "w.pt")
    for weights in ("w.safetensors", "w.pt"):
        run = in_tmp / f"runs/{weights}"
        code, _, err = run_cli(["import", "python", f"{src}:make", "--weights", weights,
                            "--data", tiny_data, "--out", run], capsys)
        assert code == 0, err
        x = torch.rand(3, 1, 8, 8)
        with torch.no_grad():
            got = imported(run).log_prob_terms(x)["log_prob"]
        torch.testing.assert_close(got, gauss_log_prob(x, 0.25, -1.0))
    score = ["score", in_tmp / "runs/w.pt", "--ood", "noise-uniform", "--limit", "8",
             "--train-limit", "0"]
    original = (in_tmp / "w.pt").read_bytes()
    torch.save({k: v + 1 for k, v in state.items()}, in_tmp / "w.pt")
    code, _, err = run_cli(score, capsys)
    assert code == 2 and "has changed since" in err and "w.pt" in err, err
    (in_tmp / "w.pt").write_bytes(original)
    assert run_cli(score, capsys)[0] == 0
    src.write_text(src.read_text() + "\nraise SystemExit('this must not run')\n")
    code, _, err = run_cli(score, capsys)
    assert code == 2 and "has changed since" in err and len(err.strip().splitlines()) == 1, err


def test_discrete_modules_take_uint8_pixels_and_get_d_log_256(in_tmp, tiny_data, capsys):
    src = module_file(in_tmp, """
        import math
        import torch
        from torch import nn


        class Uniform(nn.Module):
            '''P(k) = 1/256 per pixel: log p(x) of the dequantized image is exactly 0.'''

            def log_prob(self, k):
                assert k.dtype == torch.uint8, k.dtype
                return torch.full((len(k),), -k[0].numel() * math.log(256.0))
        """)
    code, _, err = run_cli(["import", "python", f"{src}:Uniform", "--discrete", "--data", tiny_data,
                        "--out", "runs/u"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["score", "runs/u", "--ood", "noise-uniform", "--limit", "16",
                        "--train-limit", "0"], capsys)
    assert code == 0, err
    df, meta = load_run_scores(RunDir(in_tmp / "runs/u"))
    assert meta.terms == ["log_prob", DISCRETE_TERM]
    assert df[DISCRETE_TERM].to_numpy() == pytest.approx(D * math.log(256))
    assert df["log_px"].abs().max() < 1e-9 and df["bpd"].to_numpy() == pytest.approx(8.0)
    # a density declared discrete is caught: log P(k) > 0
    dense = module_file(in_tmp, """
        import torch
        from torch import nn
        class Dense(nn.Module):
            def log_prob(self, k):
                return torch.full((len(k),), 5.0)
        """, "dense.py")
    code, _, err = run_cli(["import", "python", f"{dense}:Dense", "--discrete", "--data", tiny_data,
                        "--out", "runs/d"], capsys)
    assert code == 2 and "drop --discrete" in err, err


def test_the_modules_own_terms_become_columns_in_its_own_shape(in_tmp, tiny_data, capsys):
    src = module_file(in_tmp, """
        import torch
        from torch import nn


        class Flat(nn.Module):
            '''A flat model: two terms, over [B, 64] inputs.'''

            def __init__(self):
                super().__init__()
                self.w = nn.Parameter(torch.linspace(-1, 1, 64))

            def log_prob_terms(self, y):
                assert y.shape[1:] == (64,), y.shape
                return {"log_pz": -(y * self.w).pow(2).sum(1), "logdet_t0_scale": (y * 0 + 0.5).sum(1)}

            def log_prob(self, y):
                return sum(self.log_prob_terms(y).values())
        """)
    code, _, err = run_cli(["import", "python", f"{src}:Flat", "--input-shape", "64", "--data", tiny_data,
                        "--out", "runs/f"], capsys)
    assert code == 0, err
    assert run_cli(["score", "runs/f", "--ood", "noise-uniform", "--limit", "8", "--train-limit", "0"],
               capsys)[0] == 0
    df, meta = load_run_scores(RunDir(in_tmp / "runs/f"))
    assert meta.terms == ["log_pz", "logdet_t0_scale"]  # 0,1: no change of variables
    assert df["logdet_t0_scale"].to_numpy() == pytest.approx(32.0)


BAD_MODULES = {
    "log_prob of the wrong shape": ("""
        import torch
        from torch import nn
        class M(nn.Module):
            def log_prob(self, y):
                return y.flatten(1).sum(1, keepdim=True)
        """, "M", "gave shape"),
    "NaN log_prob": ("""
        import torch
        from torch import nn
        class M(nn.Module):
            def log_prob(self, y):
                return y.flatten(1).sum(1) * float('nan')
        """, "M", "NaN"),
    "a factory that raises": ("""
        def make():
            raise ValueError('no weights here')
        """, "make", "make() raised ValueError: no weights here (line 3)"),
    "a file that raises": ("import no_such_module_here\n", "make", "ModuleNotFoundError"),
    "a factory that is not there": ("def other():\n    pass\n", "make", "callables defined in it: other"),
    "not a module": ("def make():\n    return 3\n", "make", "not a torch.nn.Module"),
    "no log_prob": ("import torch\ndef make():\n    return torch.nn.Linear(2, 2)\n", "make",
                    "no log_prob"),
    "log_prob that raises": ("""
        import torch
        from torch import nn
        class M(nn.Module):
            def log_prob(self, y):
                return y @ torch.ones(3)
        """, "M", "log_prob raised RuntimeError"),
    "batch-dependent": ("""
        import torch
        from torch import nn
        class M(nn.Module):
            def log_prob(self, y):
                y = y.flatten(1)
                return -((y - y.mean(0)) ** 2).sum(1)
        """, "M", "other images"),
    "terms that disagree with log_prob": ("""
        import torch
        from torch import nn
        class M(nn.Module):
            def log_prob_terms(self, y):
                return {"a": -y.flatten(1).pow(2).sum(1)}
            def log_prob(self, y):
                return -y.flatten(1).pow(2).sum(1) + 1.0
        """, "M", "must agree"),
    "a term named like a column": ("""
        import torch
        from torch import nn
        class M(nn.Module):
            def log_prob_terms(self, y):
                return {"log_px": -y.flatten(1).pow(2).sum(1)}
        """, "M", "'log_px'"),
}


@pytest.mark.parametrize("why", list(BAD_MODULES))
def test_a_bad_module_is_one_line_exit_2_and_nothing_written(in_tmp, tiny_data, capsys, why):
    body, factory, expected = BAD_MODULES[why]
    src = module_file(in_tmp, body, f"bad_{abs(hash(why))}.py")
    code, out, err = run_cli(["import", "python", f"{src}:{factory}", "--data", tiny_data,
                          "--out", "runs/bad"], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert expected in err, err
    assert not (in_tmp / "runs").exists()


def test_bad_options_are_one_line_exit_2(in_tmp, tiny_data, capsys):
    src = module_file(in_tmp, GAUSS)
    torch.save(torch.nn.Linear(2, 2), in_tmp / "pickled.pt")
    torch.save({"mean": torch.zeros(3)}, in_tmp / "short.pt")
    cases = {
        "no factory": [src],
        "a bad factory name": [f"{src}:make()"],
        "a missing file": [f"{in_tmp / 'nope.py'}:make"],
        "an unknown range": [f"{src}:make", "--input-range", "0,2"],
        "discrete and a range": [f"{src}:make", "--discrete", "--input-range", "-1,1"],
        "a bad shape": [f"{src}:make", "--input-shape", "8,x"],
        "a shape of other size": [f"{src}:make", "--input-shape", "65"],
        "pickled weights": [f"{src}:make", "--weights", in_tmp / "pickled.pt"],
        "weights that do not fit": [f"{src}:make", "--weights", in_tmp / "short.pt"],
        "missing weights": [f"{src}:make", "--weights", in_tmp / "nope.pt"],
        "an option of another kind": [f"{src}:make", "--hparams", "h.json"],
    }
    for why, argv in cases.items():
        code, _, err = run_cli(["import", "python", *argv, "--data", tiny_data, "--out", "runs/x"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, (why, err)
        assert not (in_tmp / "runs").exists(), why


def test_the_documented_example_module_fits_and_imports(in_tmp, capsys):
    """examples/import/pixel_gauss.py as docs/import.md runs it, on 28x28 blobs."""
    import importlib.util

    import numpy as np
    from conftest import blobs

    np.save(in_tmp / "blobs28.npy", blobs(64, size=28))
    example = Path(__file__).resolve().parents[1] / "examples" / "import" / "pixel_gauss.py"
    spec = importlib.util.spec_from_file_location("pixel_gauss_example", example)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.fit(str(in_tmp / "blobs28.npy"), str(in_tmp / "pg.safetensors"))
    code, out, err = run_cli(["import", "python", f"{example}:make", "--weights", "pg.safetensors",
                          "--input-range", "-1,1", "--data", in_tmp / "blobs28.npy",
                          "--out", "runs/pg"], capsys)
    assert code == 0, err
    assert "log_prob, logdet_input" in out


def test_a_full_disk_while_importing_leaves_no_run_and_the_retry_works(in_tmp, tiny_data, capsys,
                                                                       monkeypatch):
    import errno

    from ood_audit.commands import import_model as import_cmd

    src = module_file(in_tmp, GAUSS)
    real_save = import_cmd.save_checkpoint

    def full_disk(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(import_cmd, "save_checkpoint", full_disk)
    argv = ["import", "python", f"{src}:make", "--data", tiny_data, "--out", "runs/g"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "no space left on device" in err.lower(), err
    assert not (in_tmp / "runs" / "g").exists()  # no folder, no lock, no temporary
    monkeypatch.setattr(import_cmd, "save_checkpoint", real_save)
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert RunDir(in_tmp / "runs" / "g").model.exists()
