"""HTTP blueprints: load input, call one service, dump output."""
