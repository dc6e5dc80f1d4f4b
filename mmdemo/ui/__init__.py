"""The web UI: one module per tab (``caption``, ``vqa``, ``create``, ``classify``, ``transcribe``), the
``models_panel``, shared pieces in ``events`` (wiring), ``widgets`` and ``messages`` (all importable from
``common``), gradio fixes in ``gradio_patches``, the feedback row under every output and ``/feedback`` in
``feedback``, and the composition in ``app``.

Each tab module has ``build(ctx)``, which creates its components inside the current Blocks, and
``demo(ctx)``, the same tab as an app of its own. Nothing here imports torch.
"""
