"""The command-line applications (``crossbar-report``, ``crossbar-eval``, ``crossbar-frontier``,
``crossbar-finetune``, ``crossbar-demo``, ``crossbar-plot-periphery``; ``scripts/*.py`` are thin
wrappers of the same ``main``). ``import crossbar_torch`` does not load them."""
