"""The leak path: which values are keys, where they sit, and the alerts they raise.

    envfile -> rules -> redact -> scan -> alerts -> watcher

`rules` knows provider token formats and the generic secret rule; `redact` hides
managed secrets and rule matches in any text; `scan` finds them in files;
`alerts` keeps the alert store; `watcher` follows the workspaces. Nothing here
imports the call path: a leak alert needs no socket, no policy, no upstream.
"""
