"""Backends are registered once, by name, and every name the config accepts is one of them."""

from __future__ import annotations

import pytest
import torch

from splitserve.config import KVBackend, KVTransferConfig
from splitserve.kv_transfer import make_receiver, make_sender
from splitserve.kv_transfer.factory import Backend, backend_names, register_backend
from splitserve.kv_transfer.stream_sender import StreamSender
from tests.kv_transfer.helpers import FakeRunner


def test_every_configurable_backend_is_registered_and_nothing_else():
    assert set(backend_names()) == {b.value for b in KVBackend} - {"auto"}


def test_a_name_registers_once():
    with pytest.raises(ValueError, match="already registered"):
        register_backend(Backend("grpc", lambda device: True, writer=None))


def test_auto_offers_what_the_device_supports_in_registration_order():
    receiver = make_receiver(KVTransferConfig(backend="auto"), FakeRunner())
    try:
        assert receiver.endpoint.backends == ("local", "grpc", "tcp")  # on CPU: no cuda_ipc, no nccl
        assert receiver.endpoint.tcp_address is not None  # the tcp backend's inbox gave its endpoint field
    finally:
        receiver.close()


def test_a_sender_is_built_from_its_backend_entry():
    receiver = make_receiver(KVTransferConfig(backend="tcp"), FakeRunner())
    sender = make_sender(KVTransferConfig(backend="tcp"), receiver.endpoint, torch.device("cpu"))
    try:
        assert isinstance(sender, StreamSender) and sender.backend == "tcp"
    finally:
        sender.close()
        receiver.close()
