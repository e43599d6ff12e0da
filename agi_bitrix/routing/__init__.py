"""Routing: a pure function from (call, CRM answer, rules, clock) to a decision."""
