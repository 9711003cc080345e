from longctx.models.common.state_dict_adapter import DECODER_HF_TO_OURS, DecoderStateDictAdapter


class Qwen3StateDictAdapter(DecoderStateDictAdapter):
    hf_to_ours = DECODER_HF_TO_OURS | {
        "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attention.q_norm.weight",
        "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attention.k_norm.weight",
    }
