"""The toy world's tokenizer: one token per word of the world, built offline with `tokenizers`.

WordLevel over the `Whitespace` pre-tokenizer (runs of word characters or of punctuation, so
`=a` is two tokens and whitespace layout never matters). Special tokens, ids fixed:
`<pad>` 0, `<unk>` 1, `<bos>` 2, `<eos>` 3; pad is distinct from eos so masks never drop a real
<eos>. Like a Llama tokenizer it prepends `<bos>` when asked for special tokens and never appends
`<eos>` (the stages append it to answers). Decoding joins tokens with single spaces, so
`decode(encode(answer))` gives back the answer's words, the form the labeller scores.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from rlhf.toy.tasks import vocabulary

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # ids 0..3 in this order


def build_tokenizer(model_max_length: int) -> PreTrainedTokenizerFast:
    """The toy tokenizer (~90 tokens); `model_max_length` should match the model's positions."""
    vocab = {token: token_id for token_id, token in enumerate([*SPECIAL_TOKENS, *vocabulary()])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # keep "c ." as two words, exactly as the labeller reads it
    )
