"""The fine-tuning ``ClientApp``: unpacks the global weights, the class list and the round's
learning-rate scale, runs :func:`task.local_finetune` and packs the reply."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedspeech.apps.finetune.settings import FinetuneSettings
from fedspeech.apps.finetune.task import CLASSES_KEY, LR_SCALE_KEY, local_finetune
from fedspeech.federated.clipping import clipping_mod
from fedspeech.federated.compression import compression_mod
from fedspeech.federated.faults import faults_mod
from fedspeech.federated.secagg import secagg_mod

# no-ops unless the run asks for them. secagg_mod first: the rest is the training step it
# masks; compression encodes what leaves the device; faults after clipping: an injected
# attacker sends what an unclipped client would
client_app = ClientApp(mods=[secagg_mod, compression_mod, faults_mod, clipping_mod])


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    state, metrics = local_finetune(
        FinetuneSettings.from_run_config(context.run_config),
        dict(context.node_config),
        msg.content["arrays"].to_torch_state_dict(),
        [str(c) for c in config[CLASSES_KEY]],
        server_round=int(config["server-round"]),
        lr_scale=float(config[LR_SCALE_KEY]),
    )
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)
