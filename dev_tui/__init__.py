"""``kluster-tui``: a Textual terminal UI for a Kluster grid (overview, launch, job detail, jobs, nodes).

  app.py        the App: tabs, keys, command palette, the poll / event-stream / job workers; ``main``
  config.py     coordinator URL and token from flags, environment, keyring, config file
  api.py        async coordinator client with timeouts (one-line errors); ``sse.py`` parses the stream
  grid.py       the grid's state (nodes, models, jobs) as last polled and patched by events
  localjobs.py  jobs launched here: route, hop timings, failovers, output (pure state)
  runner.py     runs a local job through ``engine.client`` (job queue + route + generation)
  rates.py      per-second token counts for the sparklines
  screens/      overview, jobs list, nodes table, launch form, job detail, help
  widgets/      the route chain; DataTable refresh that keeps the cursor

It talks to the coordinator's HTTP API and generates through the client library; it never imports
node or coordinator code. State modules have no Textual import, so they are tested without a terminal.
"""
