"""``python -m ood_audit``: the same CLI as the ``ood-audit`` console script."""

from ood_audit.cli.app import main

if __name__ == "__main__":
    main()
