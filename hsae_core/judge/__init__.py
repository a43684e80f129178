"""The LLM judge of parent-child links (§4.3, Appendix C): pair sampling with a random control,
the paper's prompts, verdict parsing and Yes rates (``pairs``), and the chat backends with
their response cache (``backends``). Imports ``hsae_core.evaluation`` (evidence),
``hsae_core.model`` (the forest), ``hsae_core.data`` (the local backend's language model) and
``hsae_core.common``.
"""
