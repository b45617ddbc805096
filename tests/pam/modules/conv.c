/*
 * A PAM module that probes the application's conversation function the way a careless or
 * hostile module might, and authenticates only if the application survived all of it:
 * NULL response pointer, NULL message array, a NULL message, zero and too many messages,
 * an unknown style, then one well-formed round of info, error, echo-on and echo-off
 * prompts. The echo-on answer must be the user, the echo-off answer the password given as
 * argv[0] (``password=...``), and the flags must include PAM_DISALLOW_NULL_AUTHTOK.
 * Each failed check is named on stderr and fails authentication.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <security/pam_modules.h>
#include <security/pam_appl.h>

#define CHECK(cond) do { if (!(cond)) { fprintf(stderr, "conv.c: check failed: %s\n", #cond); return PAM_AUTH_ERR; } } while (0)

static void drop(struct pam_response *resp, int n)
{
    if (resp == NULL)
        return;
    for (int i = 0; i < n; i++)
        free(resp[i].resp);
    free(resp);
}

PAM_EXTERN int pam_sm_authenticate(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    const struct pam_conv *conv = NULL;
    const char *user = NULL;
    struct pam_response *resp = NULL;
    struct pam_message info = {PAM_TEXT_INFO, "hello"};
    struct pam_message error = {PAM_ERROR_MSG, "careful"};
    struct pam_message login = {PAM_PROMPT_ECHO_ON, "login: "};
    struct pam_message secret = {PAM_PROMPT_ECHO_OFF, "Password: "};
    struct pam_message odd = {42, "choose"};
    const struct pam_message *round[] = {&info, &error, &login, &secret};
    const struct pam_message *holes[] = {&info, NULL};
    const struct pam_message *many[PAM_MAX_NUM_MSG + 1];

    CHECK(argc == 1 && strncmp(argv[0], "password=", 9) == 0);
    CHECK(flags & PAM_DISALLOW_NULL_AUTHTOK);
    CHECK(pam_get_item(pamh, PAM_CONV, (const void **)&conv) == PAM_SUCCESS && conv && conv->conv);
    CHECK(pam_get_item(pamh, PAM_USER, (const void **)&user) == PAM_SUCCESS && user);

    CHECK(conv->conv(1, round, NULL, conv->appdata_ptr) != PAM_SUCCESS);
    CHECK(conv->conv(1, NULL, &resp, conv->appdata_ptr) != PAM_SUCCESS && resp == NULL);
    CHECK(conv->conv(2, holes, &resp, conv->appdata_ptr) != PAM_SUCCESS && resp == NULL);
    CHECK(conv->conv(0, round, &resp, conv->appdata_ptr) != PAM_SUCCESS && resp == NULL);
    for (int i = 0; i <= PAM_MAX_NUM_MSG; i++)
        many[i] = &info;
    CHECK(conv->conv(PAM_MAX_NUM_MSG + 1, many, &resp, conv->appdata_ptr) != PAM_SUCCESS && resp == NULL);
    {
        const struct pam_message *mixed[] = {&secret, &odd};
        CHECK(conv->conv(2, mixed, &resp, conv->appdata_ptr) != PAM_SUCCESS && resp == NULL);
    }

    CHECK(conv->conv(4, round, &resp, conv->appdata_ptr) == PAM_SUCCESS && resp != NULL);
    int ok = resp[0].resp == NULL && resp[1].resp == NULL
        && resp[2].resp && strcmp(resp[2].resp, user) == 0
        && resp[3].resp && strcmp(resp[3].resp, argv[0] + 9) == 0;
    drop(resp, 4);
    CHECK(ok);
    return PAM_SUCCESS;
}

PAM_EXTERN int pam_sm_setcred(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh; (void)flags; (void)argc; (void)argv;
    return PAM_SUCCESS;
}
