"""The `migrator` command line (typer).  Commands parse options and call
functions that know nothing of typer; errors become exit codes in
migrator.cli.exits."""
