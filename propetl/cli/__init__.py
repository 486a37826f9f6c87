"""The command-line tools propetl-train, -eval, -export and -upgrade: thin entries with one-line errors (propetl-report: report/)."""
