"""The model side: load a Llama, capture and attribute MLP neurons, steer, generate, run experiments.

Knows nothing of Streamlit or the neuron database: anything that needs the database too lives
in :mod:`concepts`. One idea per module:

* ``loader``: the embedded model (converted once) or any Hugging Face Llama;
* ``chat``: chat templates and each message's token span;
* ``hooks``: capture and steer the input of ``mlp.down_proj`` (the neurons);
* ``trace``: a chat's activations ``[layers, tokens, neurons]`` and attribution;
* ``activation_view``: activations ÷ the neuron's extreme quantile, and rankings of them;
* ``steering``: interventions and token ranges; ``specs``: steering specs in words, their union;
* ``generate``: KV-cache decoding, sequence log-probabilities, steered vs unsteered replies;
* ``prompt_sets``, ``scoring``, ``controls``, ``experiments``, ``stats``: steering experiments;
* ``linter``: clustering important neurons into concepts, the spurious flag;
* ``llm_client``: an OpenAI-compatible endpoint client (optional; explicit configuration);
* ``cli``: ``python -m engine prepare|trace`` (``__main__`` adds ``experiment``); ``errors``: the one
  user-facing exception type.
"""
