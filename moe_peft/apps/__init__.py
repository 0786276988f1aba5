"""The applications: the `moe-peft` command (cli.py: demo, train, stats, merge, bench) and the README demo
(demo.py). They sit on top of everything and nothing imports them."""
