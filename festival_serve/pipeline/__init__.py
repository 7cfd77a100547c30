"""Pipeline wing: what every other wing agrees on — typed settings, the stage table, the serve-config rules, the wire types.

Imports only ``runtime``."""
