"""What people use without writing Python: the `ldm` command (`cli`), the web page (`web`, needs the
`[web]` extra), AUTOMATIC1111's HTTP API (`api`, needs the `[api]` extra) and prompt files rendered across
processes (`prompt_files`). They use the public API only.
"""
