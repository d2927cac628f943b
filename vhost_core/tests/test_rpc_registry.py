import errno
import logging
from typing import Literal, Optional

import attrs
import pytest


from vhost_core.rpc.registry import RpcError, RpcRegistry, RpcState, unsupported  # noqa: E402


def _positive(instance, attribute, value):
    if value <= 0:
        raise ValueError(f"'{attribute.name}' must be positive, got {value}")


@attrs.frozen
class MallocParams:
    num_blocks: int
    block_size: int = attrs.field(default=512, validator=_positive)
    name: Optional[str] = None
    uuid: str | None = None
    ratio: float = 1.0
    readonly: bool = False
    aliases: list[str] = attrs.field(factory=list)
    cpus: list[int] = attrs.field(factory=list)
    extra: dict = attrs.field(factory=dict)
    mode: Literal["rw", "ro"] = "rw"


@attrs.frozen
class Inner:
    depth: int


@attrs.frozen
class Outer:
    inner: Inner
    tag: str = "x"


@pytest.fixture
def reg():
    r = RpcRegistry()

    @r.method("bdev_malloc_create", params=MallocParams, deprecated_aliases=["construct_malloc_bdev"], owner="core")
    def create(p):
        return p

    @r.method("noargs")
    def noargs():
        return True

    return r


def err_of(reg, name, params=None):
    with pytest.raises(RpcError) as ei:
        reg.dispatch(name, params)
    return ei.value


def test_conversion_all_types(reg):
    p = reg.dispatch(
        "bdev_malloc_create",
        {
            "num_blocks": 8,
            "block_size": 4096,
            "name": "Malloc0",
            "uuid": None,
            "ratio": 2,
            "readonly": True,
            "aliases": ["a", "b"],
            "cpus": [0, 1],
            "extra": {"k": [1]},
            "mode": "ro",
        },
    )
    assert p == MallocParams(8, 4096, "Malloc0", None, 2.0, True, ["a", "b"], [0, 1], {"k": [1]}, "ro")
    assert isinstance(p.ratio, float)


def test_defaults_applied(reg):
    p = reg.dispatch("bdev_malloc_create", {"num_blocks": 1})
    assert p.block_size == 512 and p.name is None and p.aliases == [] and p.mode == "rw"


def test_unknown_parameter(reg):
    e = err_of(reg, "bdev_malloc_create", {"num_blocks": 1, "bogus": 2})
    assert e.code == -32602
    assert e.message == (
        "bdev_malloc_create: unknown parameter 'bogus'; valid parameters: num_blocks, block_size, "
        "name, uuid, ratio, readonly, aliases, cpus, extra, mode"
    )


def test_missing_required(reg):
    e = err_of(reg, "bdev_malloc_create", {"block_size": 512})
    assert (e.code, e.message) == (-32602, "bdev_malloc_create: missing required parameter 'num_blocks'")
    e = err_of(reg, "bdev_malloc_create", None)
    assert e.message == "bdev_malloc_create: missing required parameter 'num_blocks'"


@pytest.mark.parametrize(
    "key,value,msg",
    [
        ("num_blocks", "abc", "parameter 'num_blocks' must be an integer, got \"abc\""),
        ("num_blocks", True, "parameter 'num_blocks' must be an integer, got true"),
        ("num_blocks", 1.5, "parameter 'num_blocks' must be an integer, got 1.5"),
        ("readonly", 1, "parameter 'readonly' must be a boolean, got 1"),
        ("name", 5, "parameter 'name' must be a string or null, got 5"),
        ("uuid", [], "parameter 'uuid' must be a string or null, got []"),
        ("ratio", "1", "parameter 'ratio' must be a number, got \"1\""),
        ("ratio", False, "parameter 'ratio' must be a number, got false"),
        ("aliases", "a", "parameter 'aliases' must be a list of strings, got \"a\""),
        ("aliases", ["a", 1], "parameter 'aliases' must be a list of strings, got [\"a\", 1]"),
        ("cpus", [True], "parameter 'cpus' must be a list of integers, got [true]"),
        ("extra", [], "parameter 'extra' must be an object, got []"),
        ("mode", "wo", "parameter 'mode' must be one of \"rw\", \"ro\", got \"wo\""),
    ],
)
def test_type_errors(reg, key, value, msg):
    params = {"num_blocks": 1, key: value}
    e = err_of(reg, "bdev_malloc_create", params)
    assert e.code == -32602
    assert e.message == "bdev_malloc_create: " + msg


def test_long_value_truncated(reg):
    e = err_of(reg, "bdev_malloc_create", {"num_blocks": "x" * 500})
    assert len(e.message) < 150 and e.message.endswith('..."') is False and "..." in e.message


def test_validator_error(reg):
    e = err_of(reg, "bdev_malloc_create", {"num_blocks": 1, "block_size": 0})
    assert (e.code, e.message) == (-32602, "bdev_malloc_create: 'block_size' must be positive, got 0")


def test_nested_attrs():
    r = RpcRegistry()
    r.add("nest", lambda p: p, params=Outer)
    assert r.dispatch("nest", {"inner": {"depth": 3}}) == Outer(Inner(3))
    e = err_of(r, "nest", {"inner": {"depth": "deep"}})
    assert e.message == "nest: parameter 'inner.depth' must be an integer, got \"deep\""
    e = err_of(r, "nest", {"inner": {"x": 1}})
    assert e.message == "nest: unknown parameter 'inner.x'; valid parameters: depth"
    e = err_of(r, "nest", {"inner": 5})
    assert e.message == "nest: parameter 'inner' must be an object, got 5"


def test_positional_params_rejected(reg):
    e = err_of(reg, "bdev_malloc_create", [1, 512])
    assert e.code == -32602 and "positional" in e.message


def test_no_params_method(reg):
    assert reg.dispatch("noargs") is True
    assert reg.dispatch("noargs", {}) is True
    e = err_of(reg, "noargs", {"x": 1})
    assert e.code == -32602
    assert e.message == "noargs: unknown parameter 'x'; this method takes no parameters"


def test_method_not_found_plain(reg):
    e = err_of(reg, "nope")
    assert (e.code, e.message) == (-32601, "Method not found: 'nope'. See rpc_get_methods for the list.")


def test_method_not_found_hint(reg):
    reg.set_missing_hint(
        "bdev_aio_create", "It is provided by the vhost-bdev-aio plugin: pip install vhost-bdev-aio"
    )
    e = err_of(reg, "bdev_aio_create", {"filename": "/x"})
    assert e.code == -32601
    assert e.message == (
        "Method not found: 'bdev_aio_create'. It is provided by the vhost-bdev-aio plugin: "
        "pip install vhost-bdev-aio"
    )


def test_duplicate_registration(reg):
    with pytest.raises(ValueError) as ei:
        reg.add("bdev_malloc_create", lambda p: None, params=MallocParams, owner="other")
    assert str(ei.value) == "RPC method 'bdev_malloc_create' is already registered by core"
    with pytest.raises(ValueError) as ei:
        reg.add("x", lambda: None, deprecated_aliases=["construct_malloc_bdev"])
    assert str(ei.value) == "RPC method 'construct_malloc_bdev' is already registered by core"
    with pytest.raises(ValueError) as ei:
        reg.add("construct_malloc_bdev", lambda: None)
    assert "already registered by core" in str(ei.value)
    # failed registrations leave nothing behind
    assert "x" not in reg


def test_params_must_be_attrs(reg):
    with pytest.raises(TypeError):
        reg.add("y", lambda p: None, params=dict)


def test_deprecated_alias_warns_once(reg, caplog):
    caplog.set_level(logging.WARNING, logger="vhost.rpc")
    for _ in range(3):
        assert reg.dispatch("construct_malloc_bdev", {"num_blocks": 2}).num_blocks == 2
    reg.dispatch("bdev_malloc_create", {"num_blocks": 2})
    warnings = [r for r in caplog.records if r.name == "vhost.rpc" and r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "rpc: method 'construct_malloc_bdev' is deprecated, use 'bdev_malloc_create'"
    ]


def test_alias_errors_name_the_called_alias(reg):
    e = err_of(reg, "construct_malloc_bdev", {})
    assert e.message == "construct_malloc_bdev: missing required parameter 'num_blocks'"


def test_names(reg):
    assert reg.names() == sorted(
        ["bdev_malloc_create", "construct_malloc_bdev", "noargs", "rpc_get_methods", "get_rpc_methods"]
    )
    assert reg.names(include_aliases=False) == ["bdev_malloc_create", "noargs", "rpc_get_methods"]
    assert RpcRegistry(builtins=False).names() == []


def test_rpc_get_methods_builtin(reg):
    assert reg.dispatch("rpc_get_methods") == ["bdev_malloc_create", "noargs", "rpc_get_methods"]
    # SPDK's rpc.py sends both flags explicitly, even when false
    assert reg.dispatch("rpc_get_methods", {"current": False, "include_aliases": False}) == [
        "bdev_malloc_create", "noargs", "rpc_get_methods"]
    assert "construct_malloc_bdev" in reg.dispatch("rpc_get_methods", {"include_aliases": True})


def test_handler_rpc_error_passthrough():
    r = RpcRegistry()

    @r.method("bdev_get")
    def get():
        raise RpcError(-errno.ENODEV, "bdev 'x' does not exist")

    e = err_of(r, "bdev_get")
    assert (e.code, e.message) == (-19, "bdev 'x' does not exist")


def test_handler_crash_is_internal_error(caplog):
    r = RpcRegistry()

    @r.method("boom")
    def boom():
        raise KeyError("missing-thing")

    caplog.set_level(logging.ERROR, logger="vhost.rpc")
    e = err_of(r, "boom")
    assert e.code == -32603
    assert e.message == "boom: 'missing-thing'"
    rec = [x for x in caplog.records if x.levelno == logging.ERROR]
    assert rec and rec[0].exc_info is not None and "boom" in rec[0].getMessage()


def test_handler_value_error_is_internal_not_params():
    r = RpcRegistry()
    r.add("v", lambda: int("zz"))
    assert err_of(r, "v").code == -32603


def test_async_handler_via_dispatch_async():
    import asyncio

    r = RpcRegistry()

    async def slow():
        await asyncio.sleep(0)
        return 42

    async def bad():
        raise RuntimeError("nope")

    r.add("slow", slow)
    r.add("bad", bad)
    assert asyncio.run(r.dispatch_async("slow")) == 42
    e = err_of(r, "slow")  # sync dispatch refuses coroutine handlers
    assert e.code == -32603
    with pytest.raises(RpcError) as ei:
        asyncio.run(r.dispatch_async("bad"))
    assert (ei.value.code, ei.value.message) == (-32603, "bad: nope")


def test_schema(reg):
    s = reg.schema("construct_malloc_bdev")
    assert s["name"] == "bdev_malloc_create" and s["owner"] == "core"
    assert s["deprecated_aliases"] == ["construct_malloc_bdev"]
    by = {p["name"]: p for p in s["params"]}
    assert by["num_blocks"] == {"name": "num_blocks", "type": "an integer", "required": True}
    assert by["block_size"]["default"] == 512 and by["block_size"]["required"] is False
    assert by["aliases"]["type"] == "a list of strings" and by["aliases"]["default"] == []
    with pytest.raises(KeyError):
        reg.schema("nope")


def test_remove(reg):
    reg.remove("bdev_malloc_create")
    assert "bdev_malloc_create" not in reg and "construct_malloc_bdev" not in reg
    reg.add("bdev_malloc_create", lambda p: p, params=MallocParams, deprecated_aliases=["construct_malloc_bdev"])


def test_rpc_error_json():
    assert RpcError(-17, "exists").to_json() == {"code": -17, "message": "exists"}
    assert RpcError(-17, "exists", {"a": 1}).to_json() == {"code": -17, "message": "exists", "data": {"a": 1}}
    assert str(RpcError(-1, "m")) == "m"


# -- SPDK's whole parameter set: what we do not honour is refused only when asked for --------


@attrs.frozen
class SpdkMallocParams:
    num_blocks: int
    block_size: int
    physical_block_size: int | None = unsupported(None, "the physical block size is the block size",
                                                  same_as="block_size")
    md_size: int = unsupported(0, "no separate metadata; omit md_size")
    md_interleave: bool = unsupported(False, "no metadata")
    numa_id: int = unsupported(-1, "memory comes from any NUMA node")
    transport: str | None = unsupported(None, "vhost-user only", accepts=("vhost_user_blk",))


@pytest.fixture
def spdk_reg():
    r = RpcRegistry()
    r.add("bdev_malloc_create", lambda p: p, params=SpdkMallocParams)
    return r


def test_unsupported_parameters_at_their_default_pass_silently(spdk_reg):
    # What SPDK's rpc.py of today sends for `bdev_malloc_create 64 512`.
    p = spdk_reg.dispatch("bdev_malloc_create", {"num_blocks": 131072, "block_size": 512,
                                                 "md_interleave": False, "md_size": 0, "numa_id": -1,
                                                 "physical_block_size": 512, "transport": "vhost_user_blk"})
    assert (p.num_blocks, p.md_interleave, p.physical_block_size) == (131072, False, 512)
    # null is "absent": the default applies.
    assert spdk_reg.dispatch("bdev_malloc_create", {"num_blocks": 1, "block_size": 512,
                                                    "md_size": None, "numa_id": None}).md_size == 0


@pytest.mark.parametrize("key,value,shown", [
    ("md_size", 8, "md_size=8"),
    ("md_interleave", True, "md_interleave=true"),
    ("numa_id", 1, "numa_id=1"),
    ("physical_block_size", 4096, "physical_block_size=4096"),
    ("transport", "vfio_user_virtio_blk", 'transport="vfio_user_virtio_blk"'),
])
def test_unsupported_value_refused_naming_parameter_and_value(spdk_reg, key, value, shown):
    e = err_of(spdk_reg, "bdev_malloc_create", {"num_blocks": 1, "block_size": 512, key: value})
    assert e.code == -errno.ENOTSUP
    assert e.message.startswith(f"bdev_malloc_create: {shown} is not supported by this target: ")


def test_name_spdk_never_had_lists_the_valid_ones(spdk_reg):
    e = err_of(spdk_reg, "bdev_malloc_create", {"num_blocks": 1, "block_size": 512, "dif": 1})
    assert e.code == -32602
    assert e.message == ("bdev_malloc_create: unknown parameter 'dif'; valid parameters: num_blocks, "
                         "block_size, physical_block_size, md_size, md_interleave, numa_id, transport")


def test_schema_marks_unsupported_parameters(spdk_reg):
    by = {p["name"]: p for p in spdk_reg.schema("bdev_malloc_create")["params"]}
    assert by["md_size"]["unsupported"] == "no separate metadata; omit md_size"
    assert by["transport"]["accepts"] == ["vhost_user_blk"]
    assert by["physical_block_size"]["same_as"] == "block_size"
    assert "unsupported" not in by["num_blocks"]


# -- SPDK's RPC states ---------------------------------------------------------------


def test_startup_state_allows_only_startup_methods():
    r = RpcRegistry()
    r.add("bdev_get_bdevs", lambda: [])
    r.add("framework_start_init", lambda: True, states=RpcState.STARTUP)
    r.add("log_get_flags", lambda: {}, states=RpcState.STARTUP | RpcState.RUNTIME)
    r.rpc_state = RpcState.STARTUP
    e = err_of(r, "bdev_get_bdevs")
    assert (e.code, e.message) == (-1, "Method may only be called after framework is initialized using "
                                       "framework_start_init RPC.")
    assert r.dispatch("log_get_flags") == {}
    assert r.dispatch("rpc_get_methods", {"current": True}) == ["framework_start_init", "log_get_flags",
                                                                "rpc_get_methods"]
    r.rpc_state = RpcState.RUNTIME
    e = err_of(r, "framework_start_init")
    assert e.code == -1 and e.message.startswith("Method may only be called before framework is initialized. "
                                                 "Use --wait-for-rpc")
    assert r.dispatch("rpc_get_methods", {"current": True}) == ["bdev_get_bdevs", "log_get_flags",
                                                                "rpc_get_methods"]
    assert r.dispatch("rpc_get_methods") == ["bdev_get_bdevs", "framework_start_init", "log_get_flags",
                                             "rpc_get_methods"]
    assert r.schema("log_get_flags")["states"] == ["startup", "runtime"]
