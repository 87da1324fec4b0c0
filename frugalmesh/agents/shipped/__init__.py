"""The agents frugalmesh ships, each a module with an ``agent`` attribute (``frugalmesh agent run
frugalmesh.agents.shipped.<module>:agent``): ``debate`` (k debaters, r rounds, majority answer; `frugalmesh up`
runs it) and ``fixer`` (a candidate is checked locally and fixed until it passes)."""
