"""The two modalities, their names and their integer codes, defined once.

Readers label records with the names; prepared datasets, batches and the model's stem routing
carry the codes (int32 arrays). Everything else imports them from here.
"""
VISIBLE = "visible"
INFRARED = "infrared"
MODALITIES = (VISIBLE, INFRARED)
VISIBLE_CODE = 0
INFRARED_CODE = 1
CODES = {VISIBLE: VISIBLE_CODE, INFRARED: INFRARED_CODE}
NAMES = {code: name for name, code in CODES.items()}
