"""The loops a user runs, each readable top to bottom: :mod:`.train` (AlignDistil off- and
on-policy), :mod:`.dpo` (the teachers), :mod:`.sft`, :mod:`.evaluate`. Their options are the plain
dataclasses of :mod:`.configs`; the components they assemble live one level up."""
