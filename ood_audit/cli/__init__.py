"""The Typer command line. Only this package imports Typer; nothing else imports it."""
