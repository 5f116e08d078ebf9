"""
A small bank: accounts, deposits, withdrawals that refuse overdrafts,
transfers, and queries. Serve it with::

    twistd -n journal --app examples.bank:bank

Every command checks its preconditions *before* it mutates the model, so a
rejected command (which is still journaled: it is part of history) leaves
the model unchanged, live and on replay alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from txjournal import Context, Schema


class InsufficientFunds(Exception):
    """A withdrawal or transfer would overdraw an account."""


class UnknownAccount(Exception):
    """No such account."""


@dataclass
class Bank:
    accounts: dict[str, int] = field(default_factory=dict)
    opened_at: dict[str, float] = field(default_factory=dict)


bank: Schema[Bank] = Schema("bank", model=Bank)


def _positive(amount: int) -> None:
    if amount <= 0:
        raise ValueError(f"amount must be positive, got {amount}")


@bank.command("open")
@dataclass
class OpenAccount:
    """Open an empty account."""

    account: str

    def execute(self, model: Bank, ctx: Context) -> str:
        if not self.account:
            raise ValueError("account name must not be empty")
        if self.account in model.accounts:
            raise ValueError(f"account {self.account!r} already exists")
        model.accounts[self.account] = 0
        model.opened_at[self.account] = ctx.time
        return self.account


@bank.command("deposit")
@dataclass
class Deposit:
    """Add money to an account, opening it if needed; returns the new balance."""

    account: str
    amount: int

    def execute(self, model: Bank, ctx: Context) -> int:
        _positive(self.amount)
        if not self.account:
            raise ValueError("account name must not be empty")
        if self.account not in model.accounts:
            model.opened_at[self.account] = ctx.time
        balance = model.accounts.get(self.account, 0) + self.amount
        model.accounts[self.account] = balance
        return balance


@bank.command("withdraw")
@dataclass
class Withdraw:
    """Take money out; refuses to overdraw. Returns the new balance."""

    account: str
    amount: int

    def execute(self, model: Bank, ctx: Context) -> int:
        _positive(self.amount)
        balance = model.accounts.get(self.account)
        if balance is None:
            raise UnknownAccount(self.account)
        if balance < self.amount:
            raise InsufficientFunds(
                f"{self.account} has {balance}, cannot withdraw {self.amount}"
            )
        model.accounts[self.account] = balance - self.amount
        return balance - self.amount


@bank.command("transfer")
@dataclass
class Transfer:
    """Move money between two accounts; refuses to overdraw the source."""

    source: str
    target: str
    amount: int

    def execute(self, model: Bank, ctx: Context) -> dict[str, int]:
        _positive(self.amount)
        if self.source == self.target:
            raise ValueError("source and target are the same account")
        balance = model.accounts.get(self.source)
        if balance is None:
            raise UnknownAccount(self.source)
        if self.target not in model.accounts:
            raise UnknownAccount(self.target)
        if balance < self.amount:
            raise InsufficientFunds(
                f"{self.source} has {balance}, cannot transfer {self.amount}"
            )
        model.accounts[self.source] = balance - self.amount
        model.accounts[self.target] += self.amount
        return {self.source: model.accounts[self.source], self.target: model.accounts[self.target]}


@bank.query("balance")
def balance(model: Bank, account: str) -> int:
    """The balance of one account."""
    try:
        return model.accounts[account]
    except KeyError:
        raise UnknownAccount(account) from None


@bank.query("accounts")
def accounts(model: Bank) -> dict[str, int]:
    """Every account with its balance."""
    return dict(model.accounts)


@bank.query("total")
def total(model: Bank) -> int:
    """The sum of all balances: transfers conserve it."""
    return sum(model.accounts.values())
