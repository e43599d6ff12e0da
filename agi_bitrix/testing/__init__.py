"""Stand-ins for the third-party systems agi-bitrix talks to: a Bitrix24 portal, Asterisk's side of
FastAGI, and a real Asterisk driven over AMI.

They are used by the demo, the tests and the benchmarks, never by the server's call path: nothing
under server, service, app, agi/, bitrix/, routing/ or callcard/ imports this package, and
nothing here imports the product.

- `portal`: the Bitrix24 portal emulator served over HTTP (what the demo runs), built from
  `portal_model` (the portal's data and REST methods), `portal_lines` (the application's
  external lines), `portal_faults` (fault injection, for tests and benchmarks) and `portal_wire`
  (how the portal speaks HTTP); `portal_cli` serves the
  sample CRM from the command line; `portal_oauth` is a local application's OAuth side (authorize,
  token server, REST with `auth`, the install event) in front of the emulator.
- `sample_data`: a small believable CRM and the callers the demo plays.
- `fake_asterisk`: the Asterisk side of a FastAGI session.
- `pbx_harness` and `ami_calls`: a real Asterisk (22, and 20 LTS) in a chroot and test calls placed over AMI,
  for the real-Asterisk tests and the Asterisk benchmark (from a source checkout only).
"""
