#!/bin/bash
# CA chains a careless or hostile administrator makes, with the openssl CLI only (`openssl req`, `openssl ca` with its
# index database, hand-written extension sections): a root, then intermediates that each get one thing wrong (expired,
# an extended key usage without clientAuth (serverAuth; anyExtendedKeyUsage), CA:FALSE, a pathlen one CA too short, a
# UPN name constraint, a directoryName constraint, revoked by the root's CRL, an Ed25519 key, a critical
# policyConstraints), each signing a user certificate for alice@lab.test; a good intermediate beside them, user
# certificates of it that expired, signed with SHA-224, with a 1024-bit RSA key, and others it may issue (other device
# keys, a critical EKU, an empty subject, ...); a second trust anchor that expired, with a valid intermediate and user
# below it; a CA renewed with a new key (and a delta CRL of the new key over the old key's CRL); a CRL-only key of the
# good CA's name under a partner's root, and one under its own root. CRLs from `openssl ca -gencrl`, three of them
# careless.
# Usage: hostile_ca_pki.sh DIR (tests/integration/test_hostile_ca_chains.py).
set -euo pipefail
export CADIR=root  # ca.cnf names it; each `openssl ca` sets its own
cd "$1"
cat > ca.cnf <<'CNF'
[ca]
default_ca = any_ca
[any_ca]
dir = ${ENV::CADIR}
database = $dir/index.txt
new_certs_dir = $dir
serial = $dir/serial
crlnumber = $dir/crlnumber
certificate = $dir/cert.pem
private_key = $dir/key.pem
default_md = sha256
default_days = 2
default_crl_days = 2
policy = any
unique_subject = no
[any]
organizationName = optional
commonName = supplied
[req]
distinguished_name = dn
[dn]
[v3_root]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[v3_ca_pathlen0]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
[v3_ca_eku_server]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
extendedKeyUsage = serverAuth
[v3_ca_eku_any]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
extendedKeyUsage = anyExtendedKeyUsage
[v3_ca_false]
basicConstraints = critical, CA:FALSE
keyUsage = critical, keyCertSign, cRLSign
[v3_ca_nc_upn]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
nameConstraints = critical, permitted;otherName:1.3.6.1.4.1.311.20.2.3;UTF8:lab.test
[v3_ca_nc_dirname]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
nameConstraints = critical, permitted;dirName:partner_dn
[partner_dn]
O = Partner
[v3_ca_policy]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
certificatePolicies = 1.3.6.1.4.1.99999.1
policyConstraints = critical, requireExplicitPolicy:0
[v3_user_critical_eku]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = critical, clientAuth, 1.3.6.1.4.1.311.20.2.2
subjectAltName = otherName:1.3.6.1.4.1.311.20.2.3;UTF8:alice@lab.test
[v3_user_no_subject]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectAltName = critical, otherName:1.3.6.1.4.1.311.20.2.3;UTF8:alice@lab.test
[v3_user_bare]
extendedKeyUsage = clientAuth
subjectAltName = otherName:1.3.6.1.4.1.311.20.2.3;UTF8:alice@lab.test
1.3.6.1.4.1.99999.8 = DER:05:00
[v3_crl_signer]
basicConstraints = critical, CA:FALSE
keyUsage = critical, cRLSign
authorityKeyIdentifier = keyid
[crl_critical_unknown]
authorityKeyIdentifier = keyid:always
1.3.6.1.4.1.99999.7 = critical, DER:05:00
[delta_of_1]
authorityKeyIdentifier = keyid:always
2.5.29.27 = critical, DER:02:01:01
[crl_cas_only]
authorityKeyIdentifier = keyid:always
issuingDistributionPoint = critical, @cas_only
[cas_only]
onlyCA = TRUE
[v3_user]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
subjectAltName = otherName:1.3.6.1.4.1.311.20.2.3;UTF8:alice@lab.test
CNF
stamp() { date -u -d "$1" +%Y%m%d%H%M%SZ; }
newca() { mkdir -p "$1"; : > "$1/index.txt"; openssl rand -hex 8 > "$1/serial"; echo 01 > "$1/crlnumber"; }
request() {  # DIR SUBJECT: a P-256 key and a request
  openssl req -config ca.cnf -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1/key.pem" \
    -subj "$2" -out "$1/req.pem" 2>&1
}
issue() {  # ISSUER DIR EXTENSIONS [openssl ca options...]
  CADIR=$1 openssl ca -batch -config ca.cnf -notext -preserveDN -in "$2/req.pem" -out "$2/cert.pem" \
    -extensions "$3" "${@:4}" 2>&1
}
intermediate() {  # NAME EXTENSIONS [openssl ca options...]: a CA under the root, and alice's certificate from it
  newca "$1"
  request "$1" "/CN=Hostile $1 CA"
  issue root "$1" "$2" "${@:3}"
  mkdir -p "$1/alice"
  request "$1/alice" "${SUBJECT:-/CN=alice of $1}"
  issue "$1" "$1/alice" v3_user
}
newca root
openssl req -config ca.cnf -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout root/key.pem \
  -subj "/CN=Hostile Root CA" -extensions v3_root -days 10 -out root/cert.pem 2>&1
intermediate good v3_ca
intermediate expired v3_ca -startdate "$(stamp '-20 days')" -enddate "$(stamp '-10 days')"
intermediate eku_server v3_ca_eku_server
intermediate eku_any v3_ca_eku_any
intermediate not_ca v3_ca_false
intermediate nc_upn v3_ca_nc_upn
SUBJECT="/O=Partner/CN=alice" intermediate nc_dirname v3_ca_nc_dirname
intermediate revoked v3_ca
intermediate policy v3_ca_policy
# a CA below a pathlen:0 CA, and alice's certificate from it
newca pathlen0
request pathlen0 "/CN=Hostile pathlen0 CA"
issue root pathlen0 v3_ca_pathlen0
newca deep
request deep "/CN=Hostile deep CA"
issue pathlen0 deep v3_ca
mkdir -p deep/alice
request deep/alice "/CN=alice of deep"
issue deep deep/alice v3_user
# an issuing CA with an Ed25519 key (OpenSSL takes it; the certificate stage's verifier does not), alice's from it
newca ed25519
openssl req -config ca.cnf -new -newkey ed25519 -nodes -keyout ed25519/key.pem -subj "/CN=Hostile ed25519 CA" \
  -out ed25519/req.pem 2>&1
issue root ed25519 v3_ca
mkdir -p ed25519/alice
request ed25519/alice "/CN=alice of ed25519"
issue ed25519 ed25519/alice v3_user
# an issuing CA with an RSA key signing alice's certificates with RSA-PSS: with the openssl CLI's default salt (the
# longest the key allows; the certificate stage's verifier takes only the hash's length) and with the hash's length
newca rsa
openssl req -config ca.cnf -new -newkey rsa:2048 -nodes -keyout rsa/key.pem -subj "/CN=Hostile rsa CA" \
  -out rsa/req.pem 2>&1
issue root rsa v3_ca
for name in alice_pss alice_pss_digest; do mkdir -p "rsa/$name"; request "rsa/$name" "/CN=$name"; done
issue rsa rsa/alice_pss v3_user -sigopt rsa_padding_mode:pss
issue rsa rsa/alice_pss_digest v3_user -sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:digest
# and a CA below it, certified with that default PSS salt: nothing it issues can pass the certificate stage
newca pss_sub
request pss_sub "/CN=Hostile pss_sub CA"
issue rsa pss_sub v3_ca -sigopt rsa_padding_mode:pss
mkdir -p pss_sub/alice
request pss_sub/alice "/CN=alice of pss_sub"
issue pss_sub pss_sub/alice v3_user
# the good CA's own careless certificates: expired, signed with SHA-224, an RSA key of 1024 bits
for name in alice_expired alice_sha224; do mkdir -p "good/$name"; request "good/$name" "/CN=$name"; done
mkdir -p good/alice_rsa1024
openssl req -config ca.cnf -new -newkey rsa:1024 -nodes -keyout good/alice_rsa1024/key.pem -subj /CN=alice_rsa1024 \
  -out good/alice_rsa1024/req.pem 2>&1
issue good good/alice_rsa1024 v3_user
# and what it may issue and the gateway serves: device keys of other kinds, a critical EKU with smartcardLogon, an
# empty subject (the SAN critical), no basicConstraints or keyUsage with an unknown non-critical extension, and a
# certificate that outlives its CA
for kind in ed25519 ed448; do
  mkdir -p "good/alice_$kind"
  openssl req -config ca.cnf -new -newkey "$kind" -nodes -keyout "good/alice_$kind/key.pem" -subj "/CN=alice_$kind" \
    -out "good/alice_$kind/req.pem" 2>&1
  issue good "good/alice_$kind" v3_user
done
mkdir -p good/alice_p521
openssl req -config ca.cnf -new -newkey ec -pkeyopt ec_paramgen_curve:P-521 -nodes -keyout good/alice_p521/key.pem \
  -subj /CN=alice_p521 -out good/alice_p521/req.pem 2>&1
issue good good/alice_p521 v3_user
for name in alice_critical_eku alice_no_subject alice_bare alice_outlives; do mkdir -p "good/$name"; done
request good/alice_critical_eku /CN=alice_critical_eku
issue good good/alice_critical_eku v3_user_critical_eku
openssl req -config ca.cnf -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout good/alice_no_subject/key.pem \
  -subj / -out good/alice_no_subject/req.pem 2>&1
openssl x509 -req -in good/alice_no_subject/req.pem -CA good/cert.pem -CAkey good/key.pem -set_serial 0x4e05 -days 1 \
  -extfile ca.cnf -extensions v3_user_no_subject -out good/alice_no_subject/cert.pem 2>&1
request good/alice_bare /CN=alice_bare
issue good good/alice_bare v3_user_bare
request good/alice_outlives /CN=alice_outlives
issue good good/alice_outlives v3_user -enddate "$(stamp '+400 days')"
issue good good/alice_expired v3_user -startdate "$(stamp '-20 days')" -enddate "$(stamp '-10 days')"
issue good good/alice_sha224 v3_user -md sha224
# a trust anchor that expired ten days ago, an intermediate it signed before then (still valid), alice's from that
newca oldroot
request oldroot "/CN=Hostile expired Root CA"
CADIR=oldroot openssl ca -batch -config ca.cnf -notext -selfsign -in oldroot/req.pem -out oldroot/cert.pem \
  -extensions v3_root -startdate "$(stamp '-30 days')" -enddate "$(stamp '-10 days')" 2>&1
newca oldint
request oldint "/CN=Hostile oldint CA"
issue oldroot oldint v3_ca -startdate "$(stamp '-20 days')" -enddate "$(stamp '+20 days')"
mkdir -p oldint/alice
request oldint/alice "/CN=alice of oldint"
issue oldint oldint/alice v3_user
# a CA key renewal: a second key under the same CA name (AD CS's "renew with a new key pair"); alice's and bob's
# certificates from the first key, alice's revoked on that key's CRL; each key publishes its own CRL
for key in renewed_old renewed_new; do newca $key; request $key "/CN=Hostile renewed CA"; issue root $key v3_ca; done
for name in alice bob; do
  mkdir -p "renewed_old/$name"; request "renewed_old/$name" "/CN=$name of the old key"
  issue renewed_old "renewed_old/$name" v3_user
done
mkdir -p renewed_new/carol; request renewed_new/carol "/CN=carol of the new key"  # after the renewal
issue renewed_new renewed_new/carol v3_user
CADIR=renewed_old openssl ca -batch -config ca.cnf -revoke renewed_old/alice/cert.pem -crl_reason keyCompromise 2>&1
for ca in renewed_old renewed_new; do CADIR=$ca openssl ca -batch -config ca.cnf -gencrl -out "$ca/crl.pem" 2>&1; done
# then the new key signs a delta CRL on top of the old key's CRL #1 whose removeFromCRL entry lifts alice's revocation
CADIR=renewed_new openssl ca -batch -config ca.cnf -revoke renewed_old/alice/cert.pem -crl_reason removeFromCRL 2>&1
CADIR=renewed_new openssl ca -batch -config ca.cnf -gencrl -crlexts delta_of_1 -out renewed_new/delta_lifting.pem 2>&1
CADIR=root openssl ca -batch -config ca.cnf -revoke revoked/cert.pem -crl_reason keyCompromise 2>&1
for ca in root good revoked rsa; do CADIR=$ca openssl ca -batch -config ca.cnf -gencrl -out "$ca/crl.pem" 2>&1; done
cat root/crl.pem good/crl.pem revoked/crl.pem rsa/crl.pem > crls.pem
# a second trust anchor (a partner's, trusted for its own users) that certifies a CRL-only key under the good CA's
# name, and that key's CRL listing nothing: it may not speak for the good CA's certificates (RFC 5280 6.3.3 (f))
newca partner
openssl req -config ca.cnf -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout partner/key.pem \
  -subj "/CN=Hostile partner Root CA" -extensions v3_root -days 10 -out partner/cert.pem 2>&1
newca partner_crl_signer
request partner_crl_signer "/CN=Hostile good CA"
issue partner partner_crl_signer v3_crl_signer
CADIR=partner_crl_signer openssl ca -batch -config ca.cnf -gencrl -out partner_crl_signer/crl.pem 2>&1
# the same under the good CA's own root: a separate CRL key the good CA's certificates may be vouched for by
newca root_crl_signer
request root_crl_signer "/CN=Hostile good CA"
issue root root_crl_signer v3_crl_signer
CADIR=root_crl_signer openssl ca -batch -config ca.cnf -gencrl -out root_crl_signer/crl.pem 2>&1
# the good CA's careless CRLs: an unknown critical extension, a thisUpdate a day ahead, a scope of CA certificates only
crl() { CADIR=good openssl ca -batch -config ca.cnf -gencrl -out "good/$1.pem" "${@:2}" 2>&1; }
crl crl_critical_unknown -crlexts crl_critical_unknown
crl crl_future -crl_lastupdate "$(stamp '+1 day')" -crl_nextupdate "$(stamp '+3 days')"
crl crl_cas_only -crlexts crl_cas_only
