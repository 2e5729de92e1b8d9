"""``kluster-supplier``: the tray app that shares this computer's GPU with a Kluster grid.

It never runs model code itself: the node is a separate ``kluster node`` process that it starts,
watches and drains, so a crash of the node never takes the tray down (and torch never loads here).

  app           the controller and ``main``: tray, menu, timers; the loop gather -> decide -> act
  state         the pure decision: icon state, whether the node runs, and why
  supervisor    the node process (QProcess): events from its stdout, drain, restart with backoff
  childproc     exec shim so that the node dies with the app (PR_SET_PDEATHSIG)
  nodeview      node events (engine.node.events) -> what is being served
  coordinator   a small HTTP client: sign-in, this node's listing, earnings
  credentials   the supplier token: system keyring, or a 0600 file where there is none
  settings      supplier.json in the user config folder
  earnings      micro-unit formatting, the daily history behind the chart, the prediction
  gpu           NVML readings, or the CPU fallback
  idle          idle time and full-screen detection where the platform allows it
  autostart     start at login (XDG autostart entry / Windows Run key)
  notify        when to notify (first earnings of a day, errors without flooding)
  icons         the tray icons as SVG (exported to assets/icons)
  signin, dashboard, settings_tab, chart   the windows
  tasks         blocking I/O in worker threads, results back on the Qt thread
"""
