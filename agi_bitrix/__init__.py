"""agi-bitrix: a FastAGI server that routes incoming Asterisk calls to the Bitrix24 owner of the caller."""

__version__ = "0.2.0"
