"""Downstream evaluation: ASR (character CTC), keyword spotting and speaker ID.

``metrics``/``text`` score and decode; ``heads`` holds the models; ``finetune`` the
centralised runs and the train/evaluate steps a federated client reuses; ``state`` moves
trainable weights; ``probes`` and ``selection`` pick the best pretraining round per task;
``tasks`` says which utterances each task uses; ``cli`` adds ``fedspeech finetune``.
"""
