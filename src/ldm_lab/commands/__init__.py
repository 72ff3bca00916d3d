"""What each ``ldm-lab`` command does, one module per command family; ``ldm_lab.cli`` parses the
command line and calls one function here with the parsed arguments, which returns the exit code.

User mistakes are raised as ``ldm_lab.errors.UserError`` (the CLI prints them and exits with 2).
"""
