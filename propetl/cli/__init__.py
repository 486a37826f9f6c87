"""The command-line tools propetl-train, -eval and -export: thin entries with one-line errors (propetl-report: report/)."""
