"""Everything that talks to a Bitrix24 portal: the client, its errors and budget, the lookup, OAuth, the users."""
