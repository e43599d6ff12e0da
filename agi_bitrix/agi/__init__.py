"""The FastAGI wire protocol, without sockets: bytes in, events out; commands in, bytes out
(`protocol`, `quoting`), and the channel a script handler talks to (`channel`)."""
