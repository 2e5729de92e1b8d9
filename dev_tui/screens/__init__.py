"""One module per view: overview, jobs list, nodes table (tabs), launch form, job detail, help."""
