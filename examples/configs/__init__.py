"""The shipped configs, ``configs/<dataset>/<strategy>.yaml``; installed with the package as ``lrwa_plugin.configs``.

``setup.cfg`` maps the package ``lrwa_plugin.configs`` to this folder, so the demo (``python -m lrwa_plugin``) and
``lrwa_plugin.run.compare`` find the configs after ``pip install .`` as well as in a checkout::

    from lrwa_plugin.run.cli import shipped_config
    shipped_config('digits', 'lrwa_mb')   # .../lrwa_plugin/configs/digits/lrwa_mb.yaml
"""
