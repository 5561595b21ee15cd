"""A token-reduction method written outside leanvit, as a user would: keep the tokens with the largest feature
norm (after the block's attention), drop the rest, with a loss of its own. Its module and one registration are
all it takes (``register()``); ``tests/test_method_room.py`` runs it everywhere."""
from leanvit.reduction import register_reduction
from leanvit.reduction.pruning import PruningMethod


class NormPruning(PruningMethod):
    name = "test-norm"
    description = "keep the tokens with the largest feature norm"
    fuse = False
    loss_weight = 0.5

    def __init__(self):
        self.loss_calls = 0

    def token_scores(self, block, x, class_attention):
        return x[:, block.num_prefix_tokens:].norm(dim=-1)

    def training_loss(self, model):
        """A stand-in for a learned keep-score's loss: keeps the class token small."""
        self.loss_calls += 1
        return self.reduced_module(model).cls_token.square().mean()


def register() -> NormPruning:
    return register_reduction(NormPruning())
