"""The DICOM node: receives radiographs by C-STORE, reads them, sends the results back.

Runtime code: it may import ``inference``, ``io``, ``constants`` and ``errors``, never
``engine``. See :mod:`lungopacity.node.server` (the node), :mod:`lungopacity.node.spool`
(what survives a restart) and :mod:`lungopacity.node.network` (what it accepts and how it
sends).
"""

from lungopacity.node.network import ACCEPTED_SOP_CLASSES, Destination, parse_destination
from lungopacity.node.server import DicomNode, NodeConfig
from lungopacity.node.spool import Spool, instance_key

__all__ = ["ACCEPTED_SOP_CLASSES", "Destination", "DicomNode", "NodeConfig", "Spool", "instance_key",
           "parse_destination"]
