// Stub of <Foundation/Foundation.h>: the declarations tests/mps_sim/_objcxx_check.py needs (see README.md).
#pragma once
#import <objc/NSObject.h>
#include <Availability.h>
#include <TargetConditionals.h>
#include <dispatch/dispatch.h>  // Foundation includes libdispatch (through CoreFoundation)
#include <stddef.h>
#include <stdint.h>

#ifndef NS_ENUM
#define NS_ENUM(type, name) enum name : type name; enum name : type
#endif
#ifndef API_AVAILABLE
#define API_AVAILABLE(...) __attribute__((availability(macos, introduced = 11.0)))
#endif
#ifndef NS_ASSUME_NONNULL_BEGIN
#define NS_ASSUME_NONNULL_BEGIN _Pragma("clang assume_nonnull begin")
#define NS_ASSUME_NONNULL_END _Pragma("clang assume_nonnull end")
#endif

NS_ASSUME_NONNULL_BEGIN

@protocol NSCopying
- (id)copyWithZone:(nullable struct _NSZone*)zone;
@end

// https://developer.apple.com/documentation/foundation/nsstring
@interface NSString : NSObject <NSCopying>
+ (nullable instancetype)stringWithUTF8String:(const char*)nullTerminatedCString;
@property(nullable, readonly) const char* UTF8String;
@property(readonly) NSUInteger length;
@end

// https://developer.apple.com/documentation/foundation/nserror
@interface NSError : NSObject <NSCopying>
@property(readonly, copy) NSString* localizedDescription;
@property(readonly) NSInteger code;
@end

// https://developer.apple.com/documentation/foundation/nsdictionary
@interface NSDictionary<KeyType, ObjectType> : NSObject <NSCopying>
@property(readonly) NSUInteger count;
@end

NS_ASSUME_NONNULL_END
