"""
Variants of the example bank schema for the history tests, importable as
``--app history_apps:NAME`` (the tests directory is on ``sys.path``):

* ``bent``: the same commands, but ``deposit`` adds 1 extra from sequence
  number :data:`BEND_AFTER` + 1 on, as a careless code change would: the
  history replays into a different model from there on.
* ``retiring``: the bank plus ``bonus``, a command name that old journals
  hold but the code dropped on purpose.
* ``digesting``: the bank with a ``digest`` function: only balances count,
  in a canonical form.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from examples.bank import (
    Bank,
    Deposit,
    OpenAccount,
    Transfer,
    Withdraw,
    accounts,
    balance,
    total,
)
from txjournal import Context, Schema

#: ``bent``'s deposit changes behaviour for records after this one.
BEND_AFTER = 20


def _bank_like(digest: Callable[[Bank], bytes] | None = None) -> Schema[Bank]:
    schema: Schema[Bank] = Schema("bank", model=Bank, digest=digest)
    schema.command("open")(OpenAccount)
    schema.command("withdraw")(Withdraw)
    schema.command("transfer")(Transfer)
    schema.query("balance")(balance)
    schema.query("accounts")(accounts)
    schema.query("total")(total)
    return schema


bent = _bank_like()


@bent.command("deposit")
@dataclass
class BentDeposit:
    """Like the bank's deposit, with a bug that started at BEND_AFTER."""

    account: str
    amount: int

    def execute(self, model: Bank, ctx: Context) -> int:
        if self.amount <= 0:
            raise ValueError(f"amount must be positive, got {self.amount}")
        if self.account not in model.accounts:
            model.opened_at[self.account] = ctx.time
        extra = 1 if ctx.seq > BEND_AFTER else 0
        model.accounts[self.account] = model.accounts.get(self.account, 0) + self.amount + extra
        return model.accounts[self.account]


retiring = _bank_like()
retiring.command("deposit")(Deposit)
retiring.retire("bonus")


def _balances(model: Bank) -> bytes:
    return json.dumps(sorted(model.accounts.items())).encode()


digesting = _bank_like(digest=_balances)
digesting.command("deposit")(Deposit)
