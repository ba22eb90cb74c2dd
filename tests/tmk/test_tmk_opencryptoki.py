"""The TMK flow on a second PKCS#11 implementation, openCryptoki's software token (3.8 in
Debian 12): it has no EC mechanisms, no AES-CMAC, no AES-GCM, no AES key wrap and no 2-key
TDES, but RSA-OAEP with SHA-256 and a label, HMAC-SHA256 and AES-CBC-PAD wrapping. The
store adapts: the P-256 work key and the CA keys are sealed and sign in process, RSA keys
sign in the token, the TMK travels to RSA terminals by RSA-OAEP inside the token, keys are
sealed with AES-CBC-PAD and an HMAC tag. The service tests below run here unchanged (the
fixture ``keystore_backend`` picks the token; tests/tmk/conftest.py)."""

from __future__ import annotations

import pytest

from . import test_tmk_service as service

pytestmark = [
    pytest.mark.pkcs11,
    pytest.mark.parametrize("keystore_backend", ["opencryptoki"], indirect=True),
]

test_download_activates_the_tmk_the_terminal_holds = (
    service.test_download_activates_the_tmk_the_terminal_holds
)
test_tdes_profile_downloads_a_tdes_tmk = service.test_tdes_profile_downloads_a_tdes_tmk
test_a_second_download_needs_rotate_tmk_and_retires_the_old_tmk_and_its_keys = (
    service.test_a_second_download_needs_rotate_tmk_and_retires_the_old_tmk_and_its_keys
)
test_bad_confirmation_mac_leaves_no_tmk_active_and_destroys_it = (
    service.test_bad_confirmation_mac_leaves_no_tmk_active_and_destroys_it
)
test_working_keys_are_tr31_blocks_under_the_tmk_with_enforced_headers = (
    service.test_working_keys_are_tr31_blocks_under_the_tmk_with_enforced_headers
)
test_pin_block_from_the_terminal_deciphers_on_the_server = (
    service.test_pin_block_from_the_terminal_deciphers_on_the_server
)
test_rotating_the_work_certificate_needs_no_change_on_terminals = (
    service.test_rotating_the_work_certificate_needs_no_change_on_terminals
)
test_a_revoked_work_certificate_is_refused_by_terminals_given_the_crl = (
    service.test_a_revoked_work_certificate_is_refused_by_terminals_given_the_crl
)
