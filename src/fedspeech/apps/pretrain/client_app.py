"""The pretraining ``ClientApp``: unpacks the global arrays and what this node keeps between
rounds (heads under backbone-only transmission, the FedU predictor, the BYOL target, AdamW
moments), runs :func:`task.local_round` and packs the reply."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedspeech.apps.pretrain.settings import PretrainSettings
from fedspeech.apps.pretrain.task import LOCAL_STATE_KEY, OPTIMIZER_RECORD, OPTIMIZER_STATE_KEY, local_round
from fedspeech.federated.clipping import clipping_mod
from fedspeech.federated.compression import compression_mod
from fedspeech.federated.faults import faults_mod
from fedspeech.federated.secagg import secagg_mod
from fedspeech.federated.strategies import FEDU_MU_KEY

# no-ops unless the run asks for them. secagg_mod first: the rest is the training step it
# masks; compression encodes what leaves the device; faults after clipping: an injected
# attacker sends what an unclipped client would
client_app = ClientApp(mods=[secagg_mod, compression_mod, faults_mod, clipping_mod])


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    settings = PretrainSettings.from_run_config(context.run_config)
    kept = context.state.get(LOCAL_STATE_KEY)
    moments = None  # where the AdamW moments come from, by settings.optimizer_state
    if settings.optimizer_state == "client" and OPTIMIZER_STATE_KEY in context.state:
        moments = context.state[OPTIMIZER_STATE_KEY].to_torch_state_dict()
    elif settings.optimizer_state == "server" and OPTIMIZER_RECORD in msg.content.array_records:
        moments = msg.content[OPTIMIZER_RECORD].to_torch_state_dict()
    update = local_round(
        settings,
        dict(context.node_config),
        msg.content["arrays"].to_torch_state_dict(),
        kept.to_torch_state_dict() if kept is not None else {},
        server_round=int(config["server-round"]),
        lr=float(config["lr"]),
        global_step=int(config["global-step"]),
        optimizer_state=moments,
        fedu_mu=float(config[FEDU_MU_KEY]) if FEDU_MU_KEY in config else None,  # sent by the FedU strategy
    )
    context.state[LOCAL_STATE_KEY] = ArrayRecord(update.kept)
    content = RecordDict({"arrays": ArrayRecord(update.sent), "metrics": MetricRecord(update.metrics)})
    if update.optimizer_state is not None:
        if settings.optimizer_state == "client":
            context.state[OPTIMIZER_STATE_KEY] = ArrayRecord(update.optimizer_state)
        else:
            content[OPTIMIZER_RECORD] = ArrayRecord(update.optimizer_state)
    return Message(content, reply_to=msg)
