"""One module a stage; each exposes `check(cfg)` (cheap validation) and `run(cfg, tracker)`."""
