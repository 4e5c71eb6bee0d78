"""RBAC model: scopes, patterns, built-in roles, decisions (deny by default, 404 vs 403)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from isovisor.security.rbac import (
    BUILTIN_ROLES,
    ROOT,
    Authorizer,
    Decision,
    Grant,
    RoleDefinitionError,
    Scope,
    ScopeError,
    actions,
    builtin_role,
    custom_role,
    matches,
)


def test_scope_parse_and_str_roundtrip() -> None:
    for text in ("/", "/tenants/a", "/tenants/a/vms/v1", "/tenants/a/images/k"):
        assert str(Scope.parse(text)) == text


@pytest.mark.parametrize("bad", ["", "tenants/a", "/tenants", "/vms/a", "/tenants/A",
                                 "/tenants/a/vms", "/tenants/a/tenants/b", "/tenants/../x",
                                 "/tenants/a/vms/v/x/y", "/tenants/a b"])
def test_scope_rejects(bad: str) -> None:
    with pytest.raises(ScopeError):
        Scope.parse(bad)


def test_scope_containment_is_structural() -> None:
    a, ab = Scope.tenant("a"), Scope.tenant("ab")
    assert ROOT.contains(a) and a.contains(Scope.vm("a", "v"))
    assert not a.contains(ab) and not a.contains(ROOT)
    assert Scope.vm("a", "v").related(a) and not Scope.vm("a", "v").related(ab)


@pytest.mark.parametrize(("pattern", "action", "ok"), [
    ("*", "vms/start/action", True),
    ("vms/*", "vms/start/action", True),
    ("vms/*", "vmsx/read", False),
    ("*/read", "vms/metrics/read", True),
    ("*/read", "vms/write", False),
    ("VMS/READ", "vms/read", True),
    ("vms/read", "vms/readx", False),
])
def test_patterns(pattern: str, action: str, ok: bool) -> None:
    assert matches(pattern, action) is ok


def test_builtin_roles_grant_what_they_say() -> None:
    owner, contrib = BUILTIN_ROLES["Owner"], BUILTIN_ROLES["Contributor"]
    reader, op = BUILTIN_ROLES["Reader"], BUILTIN_ROLES["VM Operator"]
    auditor, admin = BUILTIN_ROLES["Auditor"], BUILTIN_ROLES["Host Admin"]
    assert owner.grants(actions.ROLE_ASSIGNMENTS_WRITE) and not owner.grants(actions.AUDIT_READ)
    assert not owner.grants(actions.QUOTAS_WRITE) and not owner.grants(actions.TENANTS_WRITE)
    assert contrib.grants(actions.VMS_WRITE) and not contrib.grants(actions.ROLE_ASSIGNMENTS_WRITE)
    assert reader.grants(actions.VMS_READ) and not reader.grants(actions.VMS_START)
    assert not reader.grants(actions.AUDIT_READ) and auditor.grants(actions.AUDIT_READ)
    assert op.grants(actions.VMS_STOP) and not op.grants(actions.VMS_WRITE)
    assert not op.grants(actions.VMS_DELETE)
    assert all(admin.grants(a) for a in actions.ALL_ACTIONS)
    assert admin.assignable_at(ROOT) and not admin.assignable_at(Scope.tenant("a"))
    assert builtin_role("vm operator") is op


def test_deny_by_default_and_hidden() -> None:
    assert Authorizer("nobody", []).decide(actions.VMS_READ, ROOT) is Decision.DENY
    assert Authorizer("nobody", []).decide(actions.VMS_READ, Scope.tenant("a")) is Decision.HIDDEN
    reader_a = Authorizer("r", [Grant(BUILTIN_ROLES["Reader"], Scope.tenant("a"))])
    assert reader_a.decide(actions.VMS_READ, Scope.vm("a", "v")) is Decision.ALLOW
    assert reader_a.decide(actions.VMS_DELETE, Scope.vm("a", "v")) is Decision.DENY
    assert reader_a.decide(actions.VMS_READ, Scope.vm("b", "v")) is Decision.HIDDEN
    assert reader_a.decide(actions.TENANTS_READ, Scope.tenant("b")) is Decision.HIDDEN
    assert reader_a.decide(actions.TENANTS_WRITE, ROOT) is Decision.DENY


def test_vm_scoped_grant_reveals_tenant_but_not_siblings() -> None:
    op = Authorizer("o", [Grant(BUILTIN_ROLES["VM Operator"], Scope.vm("a", "v1"))])
    assert op.decide(actions.VMS_START, Scope.vm("a", "v1")) is Decision.ALLOW
    assert op.decide(actions.TENANTS_READ, Scope.tenant("a")) is Decision.DENY
    assert op.decide(actions.VMS_READ, Scope.vm("a", "v2")) is Decision.HIDDEN


def test_not_actions_do_not_deny_other_grants() -> None:
    both = Authorizer("x", [Grant(BUILTIN_ROLES["Owner"], Scope.tenant("a")),
                            Grant(BUILTIN_ROLES["Auditor"], Scope.tenant("a"))])
    assert both.allows(actions.AUDIT_READ, Scope.tenant("a"))


def test_custom_role_validation() -> None:
    role = custom_role("Starter", "", ["vms/start/action", "vms/read"], [], Scope.tenant("a"))
    assert role.grants(actions.VMS_START) and not role.grants(actions.VMS_STOP)
    assert role.assignable_at(Scope.vm("a", "v")) and not role.assignable_at(Scope.tenant("b"))
    for bad in (("Owner", ["*"]), ("ok", []), ("ok", ["vms/../x"]), ("1bad", ["*"])):
        with pytest.raises(RoleDefinitionError):
            custom_role(bad[0], "", bad[1], [], ROOT)


_names = st.sampled_from(["a", "b", "ab"])
_scopes = st.one_of(
    st.just(ROOT), _names.map(Scope.tenant),
    st.tuples(_names, st.sampled_from(["v", "w"])).map(lambda t: Scope.vm(*t)),
)


@given(grants=st.lists(st.tuples(st.sampled_from(sorted(BUILTIN_ROLES)), _scopes), max_size=4),
       action=st.sampled_from(actions.ALL_ACTIONS), scope=_scopes)
def test_allow_implies_a_grant_at_or_above(grants: list[tuple[str, Scope]], action: str,
                                           scope: Scope) -> None:
    auth = Authorizer("p", [Grant(BUILTIN_ROLES[r], s) for r, s in grants])
    decision = auth.decide(action, scope)
    if decision is Decision.ALLOW:
        assert any(s.contains(scope) and BUILTIN_ROLES[r].grants(action) for r, s in grants)
    if decision is Decision.HIDDEN:
        assert scope != ROOT and not any(s.related(scope) for _, s in grants)


def test_granting_is_limited_to_what_the_granter_holds() -> None:
    owner = Authorizer("o", [Grant(BUILTIN_ROLES["Owner"], Scope.tenant("a"))])
    everything = custom_role("All", "", ["*"], [], Scope.tenant("a"))
    assert "quotas/write" in owner.missing_for_grant(everything, Scope.tenant("a"))
    assert owner.missing_for_grant(BUILTIN_ROLES["Reader"], Scope.tenant("a")) == ()
    assert owner.missing_for_grant(BUILTIN_ROLES["Reader"], Scope.tenant("b")) != ()
    admin = Authorizer("h", [Grant(BUILTIN_ROLES["Host Admin"], ROOT)])
    assert admin.missing_for_grant(everything, Scope.tenant("a")) == ()
