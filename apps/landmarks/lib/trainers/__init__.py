"""Train tasks: one class training or fine-tuning every detector from the datastore's final labels
(``.mrk.json``, ``.fcsv`` or sphere label maps), publishing the new checkpoint atomically (issue 7).
"""
