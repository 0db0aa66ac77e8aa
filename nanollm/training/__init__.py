"""Training a model: the loop and what only training needs.

loop.py is the pretraining loop (`train()`, reporting through callbacks); state.py what a run
is besides its weights; optim.py the optimisers and their schedule; memory.py the memory
estimate and activation checkpointing; average.py the weights' moving average; interrupt.py
graceful stops; distributed.py process groups. The network is nanollm.model's, checkpoint
files nanollm.checkpoint's, the machine's capabilities nanollm.hardware's. Nothing is
imported here, so loading one of these modules does not load the others.
"""
