"""What each notebook shows, one module per notebook: settings tables, figures, findings, worked examples."""
