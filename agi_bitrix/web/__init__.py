"""The admin page: what the router is doing, why a call went where it went, and a number to try.

Read-only HTML pages served by the HTTP listener (agi_bitrix.http_listener.HttpListener),
rendered by the server with Jinja2 (autoescape on), no JavaScript. `recent` keeps the last calls
in memory, `access` decides who may see the pages, `chart` draws calls per minute as SVG, and
`pages` serves them.
"""
