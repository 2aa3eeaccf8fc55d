#!/bin/bash
# A PKI made the way a stranger makes one, with the openssl CLI only (no code of ours): `openssl ca` with its
# index database, RSA keys, UTF8String subjects with non-ASCII names, users whose certificate files keep
# openssl's text dump before the PEM block, several subjectAltNames with the UPN (otherName UTF8String) among
# them, an intermediate that signs users, the gateway's certificate and the CRLs, and CRLs in PEM and DER.
# Usage: stranger_pki.sh DIR; tests/integration/test_stranger_pki.py makes further CRLs with the same config.
set -euo pipefail
cd "$1"
mkdir -p root/newcerts issuing/newcerts users
: > root/index.txt
: > issuing/index.txt
echo 1000 > root/serial
echo 2000 > issuing/serial
echo 01 > root/crlnumber
echo 01 > issuing/crlnumber
cat > openssl.cnf <<'CNF'
# what ${ENV::NSTYPE} reads when NSTYPE is not set (every command reads every section)
NSTYPE = 00
[root]
dir = root
database = $dir/index.txt
new_certs_dir = $dir/newcerts
serial = $dir/serial
crlnumber = $dir/crlnumber
certificate = $dir/cert.pem
private_key = $dir/key.pem
default_md = sha256
default_days = 30
default_crl_days = 7
policy = any
unique_subject = no
[issuing]
dir = issuing
database = $dir/index.txt
new_certs_dir = $dir/newcerts
serial = $dir/serial
crlnumber = $dir/crlnumber
certificate = $dir/cert.pem
private_key = $dir/key.pem
default_md = sha256
default_days = 30
default_crl_days = 7
policy = any
unique_subject = no
[any]
commonName = supplied
organizationName = optional
[req]
distinguished_name = dn
string_mask = utf8only
utf8 = yes
[dn]
[v3_root]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[v3_issuing]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[v3_user]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth, emailProtection
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = @user_san
[user_san]
email.1 = ${ENV::UPN}
DNS.1 = device-${ENV::NAME}.example
# FORMAT:UTF8: the value is UTF-8 already (without it openssl reads it as Latin-1 and encodes each byte again)
otherName.1 = 1.3.6.1.4.1.311.20.2.3;FORMAT:UTF8,UTF8:${ENV::UPN}
URI.1 = urn:device:${ENV::NAME}
# what [[client_certificates.restrictions]] rules name (issue 5): AD CS's certificate template extensions, as the
# openssl CLI writes them: v1, the template's name as a BMPString; v2, a SEQUENCE of the template's OID and versions
[v3_template_v1]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectAltName = @user_san
1.3.6.1.4.1.311.20.2 = ASN1:BMPSTRING:User
[v3_template_v2]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectAltName = @user_san
1.3.6.1.4.1.311.21.7 = ASN1:SEQUENCE:template_v2
[template_v2]
templateID = OID:1.3.6.1.4.1.311.21.8.4242.1
majorVersion = INT:100
minorVersion = INT:3
[v3_two_upns]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectAltName = otherName:1.3.6.1.4.1.311.20.2.3;UTF8:carol@lab.test, otherName:1.3.6.1.4.1.311.20.2.3;UTF8:alice@lab.test
[v3_server_auth_only]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = otherName:1.3.6.1.4.1.311.20.2.3;UTF8:${ENV::UPN}
[v3_no_eku]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
subjectAltName = otherName:1.3.6.1.4.1.311.20.2.3;UTF8:${ENV::UPN}
[v3_no_signing_key_usage]
# a key usage for key transport only: the device's key may not sign, and a TLS client signs its CertificateVerify
basicConstraints = critical, CA:FALSE
keyUsage = critical, keyEncipherment
extendedKeyUsage = clientAuth
subjectAltName = otherName:1.3.6.1.4.1.311.20.2.3;UTF8:${ENV::UPN}
[v3_netscape_server]
# clientAuth and digitalSignature, but an old template's Netscape certificate type naming a server only
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
nsCertType = server
subjectAltName = otherName:1.3.6.1.4.1.311.20.2.3;UTF8:${ENV::UPN}
[v3_netscape_der]
# the same with a Netscape certificate type given as its DER (NSTYPE, hex): a BIT STRING as long as a forger likes
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
2.16.840.1.113730.1.1 = DER:${ENV::NSTYPE}
subjectAltName = otherName:1.3.6.1.4.1.311.20.2.3;UTF8:${ENV::UPN}
[v3_no_upn]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectAltName = email:${ENV::UPN}, DNS:device-${ENV::NAME}.example
[v3_rogue_user]
# no authorityKeyIdentifier (openssl x509 adds one unless told): the issuer's name alone points at the trusted CA
authorityKeyIdentifier = none
subjectKeyIdentifier = none
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectAltName = otherName:1.3.6.1.4.1.311.20.2.3;UTF8:${ENV::UPN}
[v3_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:gateway.stranger.example
[crl_ext]
authorityKeyIdentifier = keyid:always
[delta_ext]
# openssl has no config name for a delta CRL indicator; the DER of INTEGER 1 (the base CRL's number) does it
authorityKeyIdentifier = keyid:always
deltaCRL = critical, DER:02:01:01
CNF
export UPN=unused NAME=unused
ca() { openssl ca -batch -config openssl.cnf -utf8 "$@" 2>&1; }
openssl req -config openssl.cnf -new -newkey rsa:2048 -nodes -keyout root/key.pem -out root/req.pem \
  -subj "/O=Stränger Örg/CN=Stränger Root CA" -utf8
ca -name root -selfsign -in root/req.pem -out root/cert.pem -extensions v3_root -days 60
openssl req -config openssl.cnf -new -newkey rsa:2048 -nodes -keyout issuing/key.pem -out issuing/req.pem \
  -subj "/O=Stränger Örg/CN=Stränger Issuing CA 1" -utf8
ca -name root -in issuing/req.pem -out issuing/cert.pem -extensions v3_issuing
# name:upn; alice-corp carries a UPN whose suffix is not the realm's (identity.realm_map maps it), alice-idn one
# whose suffix has a non-ASCII letter (refused unless identity.realm_map names it)
for entry in alice:alice@lab.test bob:bob@lab.test carol:carol@lab.test alice-corp:alice@corp.example \
    alice-idn:alice@Bücher.example; do
  export NAME=${entry%%:*} UPN=${entry#*:}
  openssl req -config openssl.cnf -new -newkey rsa:2048 -nodes -keyout "users/$NAME.key" -out "users/$NAME.req" \
    -subj "/O=Stränger Örg/CN=$NAME Ünïcode" -utf8
  ca -name issuing -in "users/$NAME.req" -out "users/$NAME.pem" -extensions v3_user
done
# carol's certificates from each template (restrictions: test_stranger_pki.py)
for template in v1 v2; do
  export NAME=template-$template UPN=carol@lab.test
  openssl req -config openssl.cnf -new -newkey rsa:2048 -nodes -keyout "users/$NAME.key" -out "users/$NAME.req" \
    -subj "/CN=carol $template" -utf8
  ca -name issuing -in "users/$NAME.req" -out "users/$NAME.pem" -extensions "v3_template_$template"
done
# two UPNs in one certificate (which user would it be?): refused, never one of them guessed
openssl req -config openssl.cnf -new -newkey rsa:2048 -nodes -keyout users/twoupns.key -out users/twoupns.req \
  -subj "/CN=two upns" -utf8
ca -name issuing -in users/twoupns.req -out users/twoupns.pem -extensions v3_two_upns
openssl req -config openssl.cnf -new -newkey rsa:2048 -nodes -keyout server.key -out server.req \
  -subj "/CN=gateway.stranger.example" -utf8
ca -name issuing -in server.req -out server.pem -extensions v3_server -notext
cat server.pem issuing/cert.pem > server-chain.pem
cat users/alice.pem issuing/cert.pem > users/alice-chain.pem
# what issue 3 says is refused, each made as a careless or hostile issuer makes it (alice's UPN, unless noted):
# expired, not yet valid, no clientAuth EKU, no EKU at all, no UPN (an e-mail SAN only), a key usage without
# digitalSignature, a Netscape certificate type of a server, and a rogue CA pair
# whose names copy the trusted root's and issuing CA's byte for byte
stamp() { date -u -d "$1" +%Y%m%d%H%M%SZ; }
user() {  # NAME EXTENSIONS [openssl ca options...]
  export NAME=$1 UPN=alice@lab.test
  openssl req -config openssl.cnf -new -newkey rsa:2048 -nodes -keyout "users/$NAME.key" -out "users/$NAME.req" \
    -subj "/CN=$NAME" -utf8
  ca -name issuing -in "users/$NAME.req" -out "users/$NAME.pem" -extensions "$2" "${@:3}"
}
user expired v3_user -startdate "$(stamp '-20 days')" -enddate "$(stamp '-10 days')"
user notyet v3_user -startdate "$(stamp '+10 days')" -enddate "$(stamp '+20 days')"
user serverauth v3_server_auth_only
user noeku v3_no_eku
user noupn v3_no_upn
user nosigning v3_no_signing_key_usage
user nsserver v3_netscape_server
# Netscape certificate types of 128 and 384 bytes (long-form lengths): SSL client first, then a server only whose
# second length byte is 0x80 (the type's first byte was read at a fixed offset)
export NSTYPE="0381810080$(printf '00%.0s' $(seq 127))"
user nslongclient v3_netscape_der
export NSTYPE="038201800040$(printf '00%.0s' $(seq 382))"
user nslongserver v3_netscape_der
mkdir -p rogue
openssl req -config openssl.cnf -x509 -new -newkey rsa:2048 -nodes -keyout rogue/root.key -out rogue/root.pem \
  -subj "/CN=Stränger Root CA/O=Stränger Örg" -utf8 -extensions v3_root -days 60
openssl req -config openssl.cnf -new -newkey rsa:2048 -nodes -keyout rogue/issuing.key -out rogue/issuing.req \
  -subj "/CN=Stränger Issuing CA 1/O=Stränger Örg" -utf8
openssl x509 -req -in rogue/issuing.req -CA rogue/root.pem -CAkey rogue/root.key -set_serial 0x2001 -days 30 \
  -extfile openssl.cnf -extensions v3_issuing -out rogue/issuing.pem
export NAME=rogue UPN=alice@lab.test
openssl req -config openssl.cnf -new -newkey rsa:2048 -nodes -keyout users/rogue.key -out users/rogue.req \
  -subj "/CN=alice/O=Stränger Örg" -utf8
openssl x509 -req -in users/rogue.req -CA rogue/issuing.pem -CAkey rogue/issuing.key -set_serial 0x2002 -days 30 \
  -extfile openssl.cnf -extensions v3_rogue_user -out users/rogue.pem
cat users/rogue.pem rogue/issuing.pem > users/rogue-chain.pem
ca -name issuing -revoke users/bob.pem -crl_reason keyCompromise
ca -name issuing -gencrl -crlexts crl_ext -out issuing/crl.pem
ca -name root -gencrl -crlexts crl_ext -out root/crl.pem
openssl crl -in issuing/crl.pem -outform DER -out issuing/crl.der
cat root/crl.pem issuing/crl.pem > crls.pem
# the CA certificates in DER too: config/example.toml says trust_anchors may be "PEM bundle or DER"
openssl x509 -in root/cert.pem -outform DER -out root/cert.der
openssl x509 -in issuing/cert.pem -outform DER -out issuing/cert.der
