"""Tasks (data sources) and the Batch they yield; see REFERENCE.md section 6."""

from looplm.data.addition import AdditionTask
from looplm.data.batch import IGNORE_INDEX, Batch, exact_match
from looplm.data.biographies import BiographyTask
from looplm.data.chat import ChatTask
from looplm.data.mano import ManoTask
from looplm.data.multihop import MultiHopTask
from looplm.data.text import HubUnreachableError, TextTask

__all__ = ["IGNORE_INDEX", "AdditionTask", "Batch", "BiographyTask", "ChatTask", "HubUnreachableError",
           "ManoTask", "MultiHopTask", "TextTask", "exact_match"]
