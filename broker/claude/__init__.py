"""Claude Code's pieces: the guard hooks' judgements and the transcript watcher.

Used through the engine (the transcript watcher) and the command line (the
hooks); nothing else in `broker` imports this package.
"""
