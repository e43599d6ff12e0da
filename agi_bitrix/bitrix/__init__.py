"""Everything that talks to (or pretends to be) a Bitrix24 portal."""
