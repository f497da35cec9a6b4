"""`pyjamba paper CLAIM`: the Jamba papers' three claims, each measured in miniature by one command.

    throughput  prefill and decode speed against context: the 1:7 hybrid, a Mixtral-like MoE and a
                Llama-like dense Transformer of matched active parameters, side by side
    memory      the KV cache and Mamba state of the real configs, the largest context a budget
                holds, and the measured peak memory of a long prefill in miniature
    recall      small models trained on associative recall and needle-in-a-haystack: pure Mamba,
                the 1:7 hybrid and pure attention at matched parameters

Modules: cli (the verb), families (the matched architectures), output (JSON lines, tables, plots),
tasks (the synthetic recall data), and one module per claim. docs/papers.md holds the results.
"""
