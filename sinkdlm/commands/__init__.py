"""One module per `sinkdlm` command (cli.py's COMMANDS table): each parses its arguments into settings
and calls the library; none holds logic of its own, and no library module imports one."""
