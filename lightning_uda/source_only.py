"""Source-only baseline: the classifier trained on labeled source data alone."""

from torch import Tensor

from lightning_uda.base import DomainAdaptationModule


class SourceOnly(DomainAdaptationModule):
    """Train on the labeled source stream and ignore the target stream.

    The lower bound that every domain adaptation result is compared with. It draws the
    same two-stream batches as the other algorithms, so the backbone, batch size and
    learning-rate schedule of a comparison are identical.

    Loss: ``L = CE(C(F(x_s)), y_s)``.

    Args:
        **kwargs: the arguments of :class:`~lightning_uda.base.DomainAdaptationModule`.

    Example::

        model = SourceOnly(feature_extractor=LeNet(), num_classes=10)
        Trainer(max_steps=1000).fit(model, datamodule=BundledDigitsDataModule())
    """

    def adaptation_step(self, source_inputs: Tensor, source_labels: Tensor, target_inputs: Tensor) -> None:
        _, logits = self.classify(source_inputs)
        loss = self.task_loss(logits, source_labels)
        self.step_optimizer(self.optimizers(), loss)
        self.log("train/loss_task", loss, prog_bar=True)
